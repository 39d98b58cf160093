"""Who is calling: API keys, enrollment tokens, principals and scopes."""
