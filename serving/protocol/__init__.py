"""Request and response bodies of the HTTP API, as msgspec Structs with OpenAI's (and vLLM's) field names."""
