"""mcp_server.py and tools.mcp_tools: the official mcp client against the project's MCP server over stdio,
and the agent loop calling the calculator through it."""
import asyncio
import sys
from pathlib import Path

import pytest

from agent import run_agent
from tools import Toolbox, mcp_tools

mcp = pytest.importorskip("mcp", reason="the mcp package serves the tools (requirements.txt)")
SERVER = str(Path(__file__).resolve().parent.parent / "mcp_server.py")


def test_the_mcp_client_lists_and_calls_the_tools_over_stdio(tmp_path):
    (tmp_path / "zorbia.md").write_text("The capital of Zorbia is Quellin.\n", encoding="utf-8")

    async def session():
        params = mcp.StdioServerParameters(command=sys.executable, args=[SERVER, "--docs", str(tmp_path)])
        async with mcp.Client(params) as client:
            names = sorted(t.name for t in (await client.list_tools()).tools)
            good = await client.call_tool("calculator", {"expression": "2+3*4"})
            bad = await client.call_tool("calculator", {"expression": "2+"})
            found = await client.call_tool("search_documents", {"query": "capital of Zorbia"})
            return names, good, bad, found
    names, good, bad, found = asyncio.run(session())
    assert names == ["calculator", "search_documents"]
    assert not good.is_error and good.content[0].text == "14"
    assert bad.is_error and "ends too early" in bad.content[0].text
    assert found.content[0].text == "[zorbia.md#0] The capital of Zorbia is Quellin."


def test_the_agent_loop_calls_a_tool_of_an_mcp_server():
    answers = ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "37*91"}}\n</tool_call>', "3367"]
    seen = []

    def model(messages, tools):
        seen.append(tools)
        return answers[len(seen) - 1]
    with mcp_tools([sys.executable, SERVER]) as tools:
        result = run_agent(model, [{"role": "user", "content": "37*91?"}], Toolbox(tools))
    assert result.calls == [("calculator", {"expression": "37*91"}, "3367")] and result.answer == "3367"
    schema = seen[0][0]["function"]
    assert schema["name"] == "calculator" and schema["parameters"]["properties"]["expression"]["type"] == "string"


def test_a_server_that_does_not_start_is_one_clear_line():
    with pytest.raises(ValueError, match="could not start the MCP server"):
        with mcp_tools([sys.executable, "-c", "import sys; sys.exit(3)"]):
            pass
