"""Tools for tests, benchmarks and the demo: the demo corpus and deployment, a local S3 server and Ray
head, tiny models, a headless-browser check and fault injection. Production code never imports this."""
