"""A process that is not an MCP server: it answers every line with text that is not JSON-RPC."""
import sys

for line in sys.stdin:
    sys.stdout.write("this is not json-rpc\n")
    sys.stdout.flush()
