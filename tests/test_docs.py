"""The examples in docstrings and the README run as written (state under a temp dir)."""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path

import pytest
from prefect import Flow

import scistream_prefect
from scistream_prefect.flows import streams as stream_flows
from scistream_prefect.tasks import gateway as gateway_tasks
from scistream_prefect.tasks import streams as stream_tasks

README = Path(__file__).parent.parent / "README.md"
CLIENT_DOC = Path(__file__).parent.parent / "docs" / "client.md"
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _examples() -> list[tuple[str, str]]:
    sources = {
        "LocalGateway": scistream_prefect.LocalGateway.__doc__,
        "get_gateway_info": gateway_tasks.get_gateway_info.__doc__,
        **{name: getattr(stream_tasks, name).__doc__ for name in stream_tasks.__all__},
        "open_stream": stream_flows.open_stream.__doc__,
        "stream_session": scistream_prefect.stream_session.__doc__,
        "README": README.read_text(),
        "docs/client.md": CLIENT_DOC.read_text(),
    }
    found = []
    for name, text in sources.items():
        for code in _BLOCK.findall(text or ""):
            lines = code.splitlines()
            indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()),
                         default=0)
            found.append((name, "\n".join(line[indent:] for line in lines)))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name, code", _examples(), ids=[n for n, _ in _examples()])
def test_example_runs(name, code, tmp_path, gateway_root):
    code = code.replace('"/tmp/', f'"{tmp_path}/')
    namespace: dict = {"__name__": "example"}
    exec(compile(code, f"<example {name}>", "exec"), namespace)
    flows = [v for v in namespace.values()
             if isinstance(v, Flow) and v.fn.__module__ == "example"]  # not the imported ones
    assert flows, f"the example in {name} defines no flow"
    for example_flow in flows:
        result = example_flow()
        if inspect.iscoroutine(result):  # an async flow's example
            asyncio.run(result)


def test_every_task_documents_its_arguments_and_a_flow_example():
    from scistream_prefect import tasks

    for name in tasks.__all__:
        doc = getattr(tasks, name).__doc__ or ""
        assert "Args:" in doc and "Returns:" in doc, name
        assert "```python" in doc and "@flow" in doc, name


def test_every_test_the_threat_model_names_exists():
    """docs/security.md's table names, for each defence, the test that shows it: each
    named file and test function exists, and each row names one."""
    page = (README.parent / "docs" / "security.md").read_text()
    named = re.findall(r"`(test_\w+\.py)(?:::(\w+))?`", page)
    assert len(named) >= 20
    for file, test in named:
        source = (README.parent / "tests" / file).read_text()
        assert not test or re.search(rf"^(async )?def {test}\(", source, re.M), f"{file}::{test}"
    rows = [line for line in page.splitlines() if line.startswith("| ") and "---" not in line]
    table = rows[rows.index(next(r for r in rows if r.startswith("| who"))) + 1:]
    assert all("test_" in row or row.rstrip().endswith("| as above |") for row in table), table
