"""The gateway: stateless uvicorn workers serving REST by transcoding the proto to gRPC.

Entry point `python -m gateway`; the ASGI factory is `gateway.app:create_app`.
"""
