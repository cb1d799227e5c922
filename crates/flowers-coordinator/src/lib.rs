//! The coordinator: run and worker state, epoch accounting, parameter averaging, checkpoints, gRPC server and client.
