"""Other ways in than the CLI, over the same library: the OpenAI-compatible HTTP API
(``openai_api``) and the MCP server (``mcp_server``, its resources in ``views``)."""
