"""`cafs run`: a container from an indexed image without containerd, run in the user's
`cafs run` process, which mounts the image (cafs/mounts/), writes an OCI runtime spec and
hands it to runc.

Apart because it is a client of the mounts with its own concern, the container's security
(its spec and seccomp profile), which nothing else imports.
"""
