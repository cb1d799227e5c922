//! The compose files are valid: `docker-compose config` (Compose v1 from Debian, which needs no
//! engine) resolves each of them with the example environment.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn compose_config(files: &[&str], env: &[(&str, &str)]) -> String {
    let dir = deploy_dir();
    let mut cmd = Command::new("docker-compose");
    cmd.current_dir(&dir).args(["--env-file", ".env.example"]);
    for f in files {
        cmd.args(["-f", f]);
    }
    let out = cmd
        .arg("config")
        .envs(env.iter().copied())
        .output()
        .expect("docker-compose (Debian package docker-compose, installed by `just setup`)");
    assert!(
        out.status.success(),
        "docker-compose config {files:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 config")
}

#[test]
fn the_gpu_cluster_reserves_gpus_and_claims_one_per_trainer() {
    let config = compose_config(&["compose.yaml"], &[]);
    for service in ["rabbitmq:", "coordinator:", "loader:", "trainer:"] {
        assert!(config.contains(service), "{service} missing:\n{config}");
    }
    assert!(config.contains("driver: nvidia"), "{config}");
    assert!(config.contains("FLOWERS_GPU_CLAIM_DIR"), "{config}");
    assert!(config.contains("50051"), "{config}");
}

#[test]
fn a_missing_setting_is_named_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(deploy_dir().join(".env.example")).unwrap();
    let without_token: String = example
        .lines()
        .filter(|l| !l.starts_with("FLOWERS_TOKEN="))
        .map(|l| format!("{l}\n"))
        .collect();
    let env = dir.path().join(".env");
    std::fs::write(&env, without_token).unwrap();
    let out = Command::new("docker-compose")
        .current_dir(deploy_dir())
        .arg("--env-file")
        .arg(&env)
        .args(["-f", "compose.yaml", "config"])
        .env_remove("FLOWERS_TOKEN")
        .output()
        .expect("docker-compose");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("set FLOWERS_TOKEN"), "{err}");
}

#[test]
fn every_service_has_a_health_check_and_waits_for_healthy_dependencies() {
    let config = compose_config(&["compose.yaml"], &[]);
    for probe in [
        "rabbitmq-diagnostics",
        "coordinator\n      - probe",
        "loader\n      - health",
        "trainer\n      - health",
    ] {
        assert!(
            config.contains(probe),
            "no health check {probe:?}:\n{config}"
        );
    }
    assert!(!config.contains("service_started"), "{config}");
    assert!(
        config.contains("published: 5672"),
        "broker port published:\n{config}"
    );
}

#[test]
fn the_cpu_override_runs_trainers_without_gpus() {
    let config = compose_config(&["compose.yaml", "compose.cpu.yaml"], &[]);
    assert!(config.contains("cpu-trainer:"), "{config}");
    assert!(config.contains("FLOWERS_DEVICE: cpu"), "{config}");
}

#[test]
fn a_remote_trainer_needs_the_central_broker_and_coordinator() {
    let env = [
        ("FLOWERS_BROKER_URL", "amqp://u:p@central:5672/%2f"),
        ("FLOWERS_COORDINATOR", "http://central:50051"),
        ("FLOWERS_TOKEN", "t"),
    ];
    let config = compose_config(&["trainer.compose.yaml"], &env);
    assert!(config.contains("http://central:50051"), "{config}");
}

#[test]
fn no_secret_is_baked_into_an_image() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    for secret in ["FLOWERS_TOKEN", "RABBITMQ_PASSWORD", "guest:guest"] {
        assert!(!dockerfile.contains(secret), "Dockerfile mentions {secret}");
    }
    assert!(
        dockerfile.contains("USER flowers"),
        "images run as a non-root user"
    );
}
