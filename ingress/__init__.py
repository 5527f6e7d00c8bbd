"""The ingress: Starlette on uvicorn; acknowledges orders into the intake streams."""
