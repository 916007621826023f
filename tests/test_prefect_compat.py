"""The Prefect stack the client extra installs works with itself (a bad FastAPI release
breaks Prefect's server while imports still succeed)."""

from prefect.client.orchestration import get_client


def test_prefect_client_and_embedded_server_agree():
    with get_client(sync_client=True) as client:
        assert isinstance(client.read_flow_runs(), list)
        assert isinstance(client.read_task_runs(), list)
        assert isinstance(client.read_logs(), list)
