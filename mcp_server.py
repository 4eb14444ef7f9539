"""
mcp_server.py -- the project's tools served over the Model Context Protocol, for any MCP client.

    python mcp_server.py                                  # the calculator, over stdio
    python mcp_server.py --docs notes/ --memory me.db     # + search_documents, recall_memory, remember

An MCP client (Claude Desktop, an IDE, or this project's own agent loop: tools.mcp_tools)
starts this program and speaks JSON-RPC to it over stdin/stdout: it lists the tools (name,
description, JSON schema of the arguments) and calls them. For example, in a client's config:

    {"mcpServers": {"workshop": {"command": "python", "args": ["/path/to/mcp_server.py", "--docs", "notes/"]}}}

The tools are tools.py's own; the `mcp` package (MCPServer) does the protocol. A tool that
fails (an expression that is not arithmetic) answers an error result, as MCP says, and the
server goes on. stdout belongs to the protocol: messages for people go to stderr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from flags import arg, main_guard, parse_config
from memory import Memory
from retrieval import Index
from tools import builtin_toolbox


@dataclass
class McpConfig:
    docs: str = arg("", "a folder of .txt/.md files to serve as the search_documents tool")
    memory: str = arg("", "a SQLite memory file (inference.py --memory) to serve as recall_memory and remember")


def build_server(docs: str = "", memory: str = ""):
    """An MCPServer with the calculator, and search / memory when their sources are given."""
    from mcp.server.mcpserver import MCPServer     # an optional dependency: only this program needs it
    from mcp.server.mcpserver.exceptions import ToolError

    index = Index.from_folder(docs) if docs else None
    store = Memory(memory) if memory else None
    toolbox = builtin_toolbox(["calculator"] + ["search"] * bool(index) + ["memory"] * bool(store), index, store)
    server = MCPServer("llm-workshop", instructions="Tools of the LLM workshop: an exact calculator, search over "
                                                   "the user's documents, and long-term memory.")
    # MCPServer reads a tool's argument schema from its Python signature: one typed function per tool,
    # each calling the tool's own run(). A bad input (ValueError) is a ToolError: the client gets its
    # message as an error result; anything else is a crash, whose details stay in the server's log
    tools = toolbox.tools

    def run(name: str, **arguments) -> str:
        try:
            return tools[name].run(**arguments)
        except ValueError as e:
            raise ToolError(str(e)) from None

    def calculator(expression: str) -> str:
        return run("calculator", expression=expression)

    def search_documents(query: str) -> str:
        return run("search_documents", query=query)

    def recall_memory(query: str) -> str:
        return run("recall_memory", query=query)

    def remember(text: str) -> str:
        return run("remember", text=text)

    for function in (calculator, search_documents, recall_memory, remember):
        if function.__name__ in tools:
            server.add_tool(function, description=tools[function.__name__].description)
    return server, toolbox


def main(argv=None):
    cfg = parse_config(McpConfig, __doc__.split("\n\n")[0].strip(), argv)
    server, toolbox = build_server(cfg.docs, cfg.memory)
    print(f"mcp_server: serving {', '.join(toolbox.tools)} over stdio", file=sys.stderr)
    server.run("stdio")


if __name__ == "__main__":
    main_guard(main)
