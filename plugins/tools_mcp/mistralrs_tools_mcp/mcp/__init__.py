"""The MCP client behind ``Runner(mcp_client_config=...)``.

* ``websocket``: the WebSocket transport (the ``mcp`` SDK 2.x has none), both halves of
  its message framing;
* ``transports``: a server's configured source opened as the SDK's message streams;
* ``connection``: one server's session, alive on the client's event loop;
* ``client``: every configured server, their tools under their registered names, and the
  synchronous calls the agentic loop makes.
"""
