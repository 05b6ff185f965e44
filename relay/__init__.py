"""The relay's transport glue between the sans-I/O tunnel protocol and the
edge and agent: the asyncio shell of a tunnel (`io`) and the HTTP header rules
of relaying (`headers`). Depends on `tunnel`; the edge and the agent depend on it."""
