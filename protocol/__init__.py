"""improv.protocol: the live protocol shared by the server and its clients.

- `messages`: the WebSocket `/v1/live` messages (pydantic models tagged by `type`), their limits
  and the close codes;
- `doc`: docs/protocol.md's reference section, generated from those models;
- `args`: the command-line options for a live session's parameters.

Imports no torch, and neither the server nor the clients.
"""
