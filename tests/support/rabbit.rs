//! [`PrivateBroker`]: a RabbitMQ node of a test's own, on free ports, that the test may stop
//! and start without disturbing the machine's shared broker or other tests.

use crate::free_port;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A RabbitMQ node with its own name, config file, data folder and ports; stopped (and its
/// folder removed) when dropped. The machine's `/etc/rabbitmq/rabbitmq.conf` pins 5672, so the
/// port goes in the node's own config file. Needs root: the server runs as user `rabbitmq`.
pub struct PrivateBroker {
    pub node: String,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl PrivateBroker {
    /// Starts the node with `extra_config` lines (e.g. `consumer_timeout = 5000`) and waits
    /// until it accepts connections.
    pub fn start(name: &str, extra_config: &[&str]) -> PrivateBroker {
        Self::start_with(name, extra_config, "[].")
    }

    /// Like [`PrivateBroker::start`], with an Erlang-term `advanced.config` too, for settings
    /// `rabbitmq.conf` has no key for (e.g. `[{rabbit, [{channel_tick_interval, 500}]}].`).
    pub fn start_with(name: &str, extra_config: &[&str], advanced_config: &str) -> PrivateBroker {
        let dir = tempfile::Builder::new()
            .prefix("flowers-rabbit-")
            .tempdir()
            .expect("broker dir");
        let port = free_port();
        let dist_port = free_port();
        let node = format!("{name}-{}@localhost", std::process::id());
        let mut config = format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n");
        for line in extra_config {
            config.push_str(line);
            config.push('\n');
        }
        let path = |p: &str| dir.path().join(p);
        std::fs::write(path("rabbitmq.conf"), config).expect("write rabbitmq.conf");
        std::fs::write(path("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        std::fs::write(path("advanced.config"), format!("{advanced_config}\n"))
            .expect("write advanced.config");
        std::fs::create_dir(path("mnesia")).expect("mnesia dir");
        std::fs::create_dir(path("log")).expect("log dir");
        run_ok(
            Command::new("chown")
                .args(["-R", "rabbitmq"])
                .arg(dir.path()),
        );
        // The temp dir's parent must let user rabbitmq in.
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        run_ok(
            Command::new("rabbitmq-server")
                .arg("-detached")
                .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
                .env("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config"))
                .env("RABBITMQ_NODENAME", &node)
                .env("RABBITMQ_DIST_PORT", dist_port.to_string())
                .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
                .env("RABBITMQ_LOG_BASE", path("log"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
        );
        let broker = PrivateBroker { node, port, dir };
        broker.ctl(&["wait", "--timeout", "60", &broker.pid_file()]);
        broker.wait_accepting();
        broker
    }

    /// The node's AMQP URL (guest/guest, vhost `/`).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the RabbitMQ application (the node keeps running: `start` brings it back with
    /// its durable queues and persistent messages).
    pub fn stop(&self) {
        self.ctl(&["stop_app"]);
    }

    /// Starts the application again and waits until it accepts connections.
    pub fn start_again(&self) {
        self.ctl(&["start_app"]);
        self.wait_accepting();
    }

    fn pid_file(&self) -> String {
        let dir: &Path = self.dir.path();
        dir.join("mnesia")
            .join(format!("{}.pid", self.node))
            .display()
            .to_string()
    }

    fn ctl(&self, args: &[&str]) {
        run_ok(
            Command::new("rabbitmqctl")
                .args(["-n", &self.node])
                .args(args),
        );
    }

    fn wait_accepting(&self) {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "RabbitMQ node {} is not listening on {}",
                self.node,
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output();
    }
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
