//! RabbitMQ topology, confirmed publishing with backpressure, consuming with dead-lettering.
