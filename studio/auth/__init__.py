"""Who may use the studio: one gate for both web servers.

* ``tokens``       the studio's secret (generated once, kept 0600) and signed browser cookies
* ``credentials``  how clients (the kernel, ``studio run``, the bench) find what to send
* ``gate``         the ASGI middleware in front of both apps: Host allowlist, cross-site checks,
                   authentication (Bearer, Basic, cookie), the login page

Nothing is imported here, so a client importing ``studio.auth.credentials`` stays light.
"""
