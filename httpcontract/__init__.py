"""The HTTP contract every hop keeps (edge, agent, inference server, load
tester): the `Server-Timing` entries and their parsing (`timing`), the
`X-Request-ID` rule (`request_id`), and the one JSON error shape (`problem`).
Pure functions, no I/O; docs/architecture.md ("Timing contract", the
concern -> module table) and docs/operations.md ("Errors clients see")."""
