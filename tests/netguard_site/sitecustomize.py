"""Installs the test suite's socket guard in every Python subprocess the tests start.

conftest puts this directory (and tests/) on PYTHONPATH, so CLI runs, served
deployments, gateway workers and Jupyter kernels are held to loopback too.
"""

import netguard

netguard.install()
