fn main() {
    flowers_telemetry::init();
    tracing::info!("loader: not built yet");
}
