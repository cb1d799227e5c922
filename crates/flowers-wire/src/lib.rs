//! The Batch wire format: building, checksums, size limits and verification.
