"""`fgdilp-cpp serve`: an OpenAI-compatible HTTP server over one Detoxifier (server.py), its
model thread (model_queue.py), request parsing and checks (openai_*.py, request_cost.py) and the
transport guards uvicorn lacks (http_guard.py)."""
