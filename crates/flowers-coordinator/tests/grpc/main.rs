//! The coordinator over real gRPC: a server started in-process on a free port.

mod epochs;
mod rounds;
mod serving;
mod support;
