"""HTTP, SSE, WebSocket and OpenAI-compatible routes of the reference server."""
