//! JPEG decode, square centre crop and resize to RGB uint8.
