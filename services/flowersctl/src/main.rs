fn main() {
    flowers_telemetry::init();
    tracing::info!("flowersctl: not built yet");
}
