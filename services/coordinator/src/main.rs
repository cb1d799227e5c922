fn main() {
    flowers_telemetry::init();
    tracing::info!("coordinator: not built yet");
}
