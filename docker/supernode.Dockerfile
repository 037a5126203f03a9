# The official Flower SuperNode image, unchanged but for the pinned version:
# with --isolation process the SuperNode never imports the app (its ClientApps
# run in the node's SuperExec container), so it needs no app dependencies.
ARG FLWR_VERSION=1.42.0
FROM flwr/supernode:${FLWR_VERSION}
WORKDIR /app
ENTRYPOINT ["flower-supernode"]
