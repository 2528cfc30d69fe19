"""The MCP config classes (mistralrs_core.api.tools) refuse bad values with a ValueError
naming the field; the JSON form of the config; the provider and capability the
distribution registers; how server tools are offered (strict when their schema compiles)."""
import pytest

from mistralrs import McpClientConfigPy, McpServerConfigPy, McpServerSourcePy
from mistralrs_core import capabilities, plugins
from mistralrs_tools_mcp.mcp.client import closed_objects, schema_constrains
from mistralrs_tools_mcp.mcp.transports import request_headers
from mistralrs_tools_mcp.mcp_provider import McpToolProvider, config_from_json

HTTP = McpServerSourcePy.Http(url="http://127.0.0.1:9/mcp")


@pytest.mark.parametrize("make, field", [
    (lambda: McpServerSourcePy.Http(url="ftp://x/mcp"), "McpServerSourcePy.Http.url"),
    (lambda: McpServerSourcePy.Http(url="http://x/mcp", timeout_secs=0), "McpServerSourcePy.Http.timeout_secs"),
    (lambda: McpServerSourcePy.Http(url="http://x", headers={"X": 1}), "McpServerSourcePy.Http.headers"),
    (lambda: McpServerSourcePy.WebSocket(url="http://x/mcp"), "McpServerSourcePy.WebSocket.url"),
    (lambda: McpServerSourcePy.Process(command=" "), "McpServerSourcePy.Process.command"),
    (lambda: McpServerSourcePy.Process(command="srv", args=["a", 1]), "McpServerSourcePy.Process.args"),
    (lambda: McpServerSourcePy.Process(command="srv", env={"A": None}), "McpServerSourcePy.Process.env"),
    (lambda: McpServerConfigPy(id="", name="n", source=HTTP), "McpServerConfigPy.id"),
    (lambda: McpServerConfigPy(id="a", name="n", source=HTTP, tool_prefix="we b"), "McpServerConfigPy.tool_prefix"),
    (lambda: McpServerConfigPy(id="a", name="n", source=HTTP, resources=[""]), "McpServerConfigPy.resources"),
    (lambda: McpServerConfigPy(id="a", name="n", source=HTTP, enabled="yes"), "McpServerConfigPy.enabled"),
    (lambda: McpServerConfigPy(id="a", name="n", source=HTTP, bearer_token=""), "McpServerConfigPy.bearer_token"),
    (lambda: McpClientConfigPy(servers=[McpServerConfigPy(id="a", name="n", source=HTTP)] * 2),
     r"McpClientConfigPy.servers\[1\].id"),
    (lambda: McpClientConfigPy(servers=[{"id": "a"}]), r"McpClientConfigPy.servers\[0\]"),
    (lambda: McpClientConfigPy(servers=[], tool_timeout_secs=-1), "McpClientConfigPy.tool_timeout_secs"),
    (lambda: McpClientConfigPy(servers=[], max_concurrent_calls=0), "McpClientConfigPy.max_concurrent_calls"),
])
def test_bad_values_name_their_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        make()


def test_bearer_token_and_headers():
    cfg = McpServerConfigPy(id="a", name="A", bearer_token="t0k", source=McpServerSourcePy.WebSocket(
        url="wss://x/mcp", headers={"authorization": "Basic old", "X-Api-Version": "v1"}))
    assert request_headers(cfg) == {"X-Api-Version": "v1", "Authorization": "Bearer t0k"}


def test_json_form():
    config = config_from_json({"servers": [
        {"name": "fs", "source": {"type": "Process", "command": "srv", "args": ["--root", "/tmp"]},
         "tool_prefix": "fs"},
        {"id": "hf", "name": "HF", "source": {"type": "Http", "url": "https://hf.co/mcp", "timeout_secs": 30},
         "bearer_token": "x", "enabled": False}],
        "tool_timeout_secs": 5})
    fs, hf = config.servers
    assert (fs.id, fs.name, fs.source.args, fs.tool_prefix) == ("fs", "fs", ["--root", "/tmp"], "fs")
    assert hf.source.timeout_secs == 30 and hf.enabled is False and config.tool_timeout_secs == 5
    with pytest.raises(ValueError, match=r"servers\[0\].source.type"):
        config_from_json({"servers": [{"id": "a", "source": {"type": "Carrier pigeon"}}]})
    with pytest.raises(ValueError, match=r"servers\[0\]: .*unexpected keyword"):
        config_from_json({"servers": [{"id": "a", "source": {"type": "Http", "url": "http://x/m"}, "colour": 1}]})


def test_the_distribution_provides_mcp():
    plugins.reset()
    try:
        assert capabilities.provided()["mcp"] == "tools_mcp"
        assert plugins.get_registry().tool_providers["mcp"].load() is McpToolProvider
        with pytest.raises(ValueError, match="mcp_client_config: must be a McpClientConfigPy, got str"):
            McpToolProvider().build({"mcp_client_config": "servers.json"})
        # Nothing enabled: a client with no tools (and no thread left behind once closed).
        client = McpToolProvider().build({"mcp_client_config": McpClientConfigPy(
            servers=[McpServerConfigPy(id="a", name="A", source=HTTP, enabled=False)])})
        assert client.tool_definitions() == [] and client.servers() == {}
        client.close()
        assert not client._loop.thread.is_alive()
    finally:
        plugins.reset()


def test_tools_are_strict_when_their_schema_compiles():
    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "o": {"type": "object", "properties": {"b": {"type": "string"}}},
                                               "free": {"type": "object"}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["o"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["free"]    # no properties listed: left open
    assert "additionalProperties" not in schema                           # the server's copy untouched
    assert schema_constrains(closed)
    assert not schema_constrains({"type": "object", "properties": {"a": {"$ref": "#/missing"}}})
