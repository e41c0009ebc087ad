# The worker image the test node runs: docker/worker.Dockerfile built with EXTRAS="" (no
# torch) plus the tests' small python tools (tests/genq_testtools.py: echo with sleep,
# planned failures, crashes), so pools of kind python can run in real pods.
# Built by tests/k8s/build-images.sh with tests/ as the context.
ARG WORKER_IMAGE=localhost/genq-worker-cpu:latest
FROM ${WORKER_IMAGE}
COPY genq_testtools.py /opt/genq-tests/
ENV PYTHONPATH=/opt/genq-tests
