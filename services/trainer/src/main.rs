fn main() {
    flowers_telemetry::init();
    tracing::info!("trainer: not built yet");
}
