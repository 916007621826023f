/* The least a relay can do: the benchmark's floor for plain chains (bench/dataplane.py).
 *
 *     floor_relay splice|copy LISTEN_PORT TARGET_PORT
 *
 * Accepts TCP connections on 127.0.0.1:LISTEN_PORT, connects each to
 * 127.0.0.1:TARGET_PORT, and moves both directions, a thread per direction with
 * blocking calls: "splice" through a 1 MiB pipe (the bytes never enter user space),
 * "copy" through a 1 MiB buffer (read/write). An end of data is passed on (shutdown of
 * the writing side); nothing else: no TLS, no control, no accounting, no limits.
 * Two of them in a chain show what any proxy can reach on this machine's loopback.
 * Prints "ready" once it listens; runs until killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (1 << 20)

static int use_splice;
static int target_port;

struct direction {
    int src, dst;
};

static void move_spliced(int src, int dst) {
    int pipefd[2];
    if (pipe(pipefd) != 0)
        return;
    fcntl(pipefd[1], F_SETPIPE_SZ, CHUNK); /* best effort: the default is 64 KiB */
    for (;;) {
        ssize_t n = splice(src, NULL, pipefd[1], NULL, CHUNK, SPLICE_F_MOVE);
        if (n <= 0)
            break;
        while (n > 0) {
            ssize_t m = splice(pipefd[0], NULL, dst, NULL, (size_t)n, SPLICE_F_MOVE);
            if (m <= 0)
                goto done;
            n -= m;
        }
    }
done:
    close(pipefd[0]);
    close(pipefd[1]);
}

static void move_copied(int src, int dst) {
    char *buf = malloc(CHUNK);
    if (buf == NULL)
        return;
    for (;;) {
        ssize_t n = read(src, buf, CHUNK);
        if (n <= 0)
            break;
        for (ssize_t off = 0; off < n;) {
            ssize_t m = write(dst, buf + off, (size_t)(n - off));
            if (m <= 0)
                goto done;
            off += m;
        }
    }
done:
    free(buf);
}

static void *run_direction(void *arg) {
    struct direction *d = arg;
    if (use_splice)
        move_spliced(d->src, d->dst);
    else
        move_copied(d->src, d->dst);
    shutdown(d->dst, SHUT_WR);
    return NULL;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return addr;
}

static void *run_connection(void *arg) {
    int app = (int)(long)arg;
    int peer = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in target = loopback(target_port);
    if (peer >= 0 && connect(peer, (struct sockaddr *)&target, sizeof target) == 0) {
        struct direction forward = {app, peer}, backward = {peer, app};
        pthread_t a, b;
        if (pthread_create(&a, NULL, run_direction, &forward) == 0) {
            if (pthread_create(&b, NULL, run_direction, &backward) == 0)
                pthread_join(b, NULL);
            else
                shutdown(app, SHUT_RDWR);
            pthread_join(a, NULL);
        }
    }
    if (peer >= 0)
        close(peer);
    close(app);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4 || (strcmp(argv[1], "splice") != 0 && strcmp(argv[1], "copy") != 0)) {
        fprintf(stderr, "usage: %s splice|copy LISTEN_PORT TARGET_PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN); /* a peer that went away is an error return, not death */
    use_splice = strcmp(argv[1], "splice") == 0;
    target_port = atoi(argv[3]);
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in addr = loopback(atoi(argv[2]));
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(listener, 256) != 0) {
        perror("floor_relay: listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int app = accept(listener, NULL, NULL);
        if (app < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            perror("floor_relay: accept");
            return 1;
        }
        pthread_t thread;
        if (pthread_create(&thread, NULL, run_connection, (void *)(long)app) != 0) {
            close(app);
            continue;
        }
        pthread_detach(thread);
    }
}
