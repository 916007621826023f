"""Endpoint configs a gateway operator installs, shipped inside the package so that
``scistream-gateway render-config`` finds them wherever the package is installed."""
