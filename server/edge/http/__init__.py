"""The HTTP front door (serve --http-port): the OpenAI Images API, the native JSON/SSE route and the
playground page, over the same EdgeCore as gRPC (issue 22)."""
