"""Entry point of a gateway's native relay: ``python -m scistream_proxy.native_daemon``.

Kept apart from ``native`` so that running it never re-imports a module the package
already loaded.
"""

import sys

from scistream_proxy.native import main

if __name__ == "__main__":
    sys.exit(main())
