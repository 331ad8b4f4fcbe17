"""`emsfl dashboard`: a live web page of a running testbed (aiohttp, Server-Sent Events, plain JS + SVG)."""
