"""The two-facility world on one machine: network namespaces, the Globus cloud's stand-ins,
a real RabbitMQ, real endpoint daemons and a real Prefect server and worker."""
