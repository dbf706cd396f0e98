"""The web dashboard the Deployer serves on its own port, with its Prometheus ``/metrics``
(``server.Dashboard``).  Static assets (``static/``) ship inside the package: no build
step, no CDN."""
