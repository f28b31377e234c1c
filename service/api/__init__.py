"""Transports over the use case: REST routers, gRPC, the web UI, auth, and one error table.

Nothing here decides what to recommend; it parses, authorises, calls the core
(`service.recommendations`, `service.profiles`) and maps domain errors to statuses.
"""
