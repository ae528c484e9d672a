"""Transport: CurveZMQ, ZeroMQ on asyncio, peer hang-up."""
