# The official Flower SuperLink image, with a state folder its user (app, uid
# 49999) can write: the SuperLink keeps runs and registered SuperNode keys in
# --database, so a restart does not forget which nodes may join.
ARG FLWR_VERSION=1.42.0
FROM flwr/superlink:${FLWR_VERSION}
USER root
RUN mkdir -p /app/state && chown app:app /app/state
USER app
WORKDIR /app
ENTRYPOINT ["flower-superlink"]
