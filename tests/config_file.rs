//! `--config FILE` for the daemons, through real processes: precedence flag >
//! environment > file > default, one-line errors naming the key and the
//! file, and `--print-config` output that round-trips.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{Process, START_DEADLINE, wait_for_state};
use muster::proto::NodeState;

/// Runs `muster ARGS` with `env` and no other `MUSTER_*` variable.
fn muster(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_muster"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MUSTER_") {
            command.env_remove(name);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run muster")
}

fn stdout_of(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The value of `key` in `muster --print-config` output.
fn setting<'a>(printed: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key} = ");
    printed
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key} in:\n{printed}"))
}

fn assert_one_line_error(output: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for needle in expected {
        assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    }
    assert!(output.stdout.is_empty(), "{output:?}");
}

/// A config file that cannot be read or used is a usage error, like a
/// command line clap cannot parse: status 2 and one line.
fn assert_config_file_error(output: &Output, expected: &[&str]) {
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_one_line_error(output, expected);
}

#[test]
fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(
        dir.path(),
        "coordinator.toml",
        "max-streams = 5\n\
         max-registrations-per-second = 6\n\
         probe-timeout = \"7s\"\n\
         log = \"warn\"\n",
    );
    let file = file.to_str().unwrap();
    let output = muster(
        &[
            "coordinator",
            "--config",
            file,
            "--max-streams",
            "500",
            "--print-config",
        ],
        &[
            ("MUSTER_MAX_STREAMS", "50"),
            ("MUSTER_MAX_REGISTRATIONS_PER_SECOND", "60"),
        ],
    );
    let printed = stdout_of(&output);
    assert_eq!(setting(&printed, "max-streams"), "500", "flag over env");
    assert_eq!(
        setting(&printed, "max-registrations-per-second"),
        "60",
        "env over file"
    );
    assert_eq!(
        setting(&printed, "probe-timeout"),
        "\"7s\"",
        "file over default"
    );
    assert_eq!(
        setting(&printed, "log"),
        "\"warn\"",
        "a global flag from the file"
    );
    assert_eq!(setting(&printed, "expire-after"), "\"24h\"", "default");

    let from_env = muster(
        &["coordinator", "--print-config"],
        &[("MUSTER_CONFIG", file)],
    );
    assert_eq!(setting(&stdout_of(&from_env), "max-streams"), "5");
}

#[tokio::test]
async fn daemons_run_on_the_settings_of_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("from-file.db");
    let coordinator_file = write_config(
        dir.path(),
        "coordinator.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nhttp-listen = \"127.0.0.1:0\"\ndb = {db:?}\nheartbeat-interval = \"500ms\"\noffline-after = \"3s\"\n"
        ),
    );
    let coordinator = Process::start(
        "coordinator",
        &[
            "coordinator".into(),
            "--config".into(),
            path_arg(&coordinator_file),
        ],
    );
    assert!(
        db.exists(),
        "the database named in the file was not created"
    );

    let agent_file = write_config(
        dir.path(),
        "agent.toml",
        &format!(
            "coordinator = {:?}\nlisten = \"127.0.0.1:0\"\nnode-id = \"from-file\"\n\
             state-dir = {:?}\nlabel = [\"gpu=a100\", \"zone=lab\"]\n",
            coordinator.url(),
            dir.path().join("agent-state"),
        ),
    );
    let _agent = Process::start(
        "agent",
        &["agent".into(), "--config".into(), path_arg(&agent_file)],
    );
    let nodes = wait_for_state(
        &coordinator.url(),
        &["from-file"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await;
    let labels = &nodes[0].labels;
    assert_eq!(labels.get("gpu").map(String::as_str), Some("a100"));
    assert_eq!(labels.get("zone").map(String::as_str), Some("lab"));
    assert!(dir.path().join("agent-state").is_dir());
}

fn path_arg(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

#[test]
fn an_unknown_key_is_one_line_naming_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["coordinator", "agent"] {
        let file = write_config(dir.path(), "typo.toml", "heartbeat-intervall = \"5s\"\n");
        let file = file.to_str().unwrap();
        let output = muster(&[command, "--config", file], &[]);
        assert_config_file_error(&output, &["`heartbeat-intervall`", file]);
    }
}

#[test]
fn a_value_of_the_wrong_type_is_one_line_naming_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for (command, text, key) in [
        (
            "coordinator",
            "heartbeat-interval = \"soon\"\n",
            "`heartbeat-interval`",
        ),
        ("coordinator", "max-streams = \"many\"\n", "`max-streams`"),
        ("coordinator", "listen = [\"127.0.0.1:0\"]\n", "`listen`"),
        ("agent", "label = [\"novalue\"]\n", "`label`"),
        ("agent", "max-backoff = { seconds = 1 }\n", "`max-backoff`"),
    ] {
        let file = write_config(dir.path(), "wrong.toml", text);
        let file = file.to_str().unwrap();
        // A flag overriding the key does not hide the file's mistake.
        let output = muster(&[command, "--config", file, "--print-config"], &[]);
        assert_config_file_error(&output, &[key, file]);
    }
    let file = write_config(dir.path(), "broken.toml", "listen = \n");
    let output = muster(&["coordinator", "--config", file.to_str().unwrap()], &[]);
    assert_config_file_error(&output, &[file.to_str().unwrap(), "not valid TOML"]);
    let missing = dir.path().join("missing.toml");
    let output = muster(&["agent", "--config", missing.to_str().unwrap()], &[]);
    assert_config_file_error(&output, &[missing.to_str().unwrap(), "cannot read"]);
}

/// Prints the configuration of `muster COMMAND FLAGS` under `env`, feeds
/// it back with --config alone, and checks that it prints the same again.
fn assert_round_trip(dir: &Path, command: &str, flags: &[&str], env: &[(&str, &str)]) -> String {
    let mut args = vec![command, "--print-config"];
    args.extend(flags);
    let first = stdout_of(&muster(&args, env));
    let file = write_config(dir, &format!("{command}.toml"), &first);
    let second = stdout_of(&muster(
        &[
            command,
            "--config",
            file.to_str().unwrap(),
            "--print-config",
        ],
        &[],
    ));
    assert_eq!(
        first, second,
        "{command}: printed config changed on a round trip"
    );
    first
}

#[test]
fn print_config_round_trips_through_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let token = "join-token-that-must-not-be-printed";
    let token_file = write_config(dir.path(), "join.token", token);
    let token_file = token_file.to_str().unwrap();
    let db = dir.path().join("a \"quoted\" name.db");
    let printed = assert_round_trip(
        dir.path(),
        "coordinator",
        &[
            "--heartbeat-interval",
            "2s",
            "--offline-after",
            "1m 30s",
            "--join-token-file",
            token_file,
            "--db",
            db.to_str().unwrap(),
        ],
        &[
            ("MUSTER_MAX_STREAMS", "123"),
            ("MUSTER_LOG", "info,muster=debug"),
        ],
    );
    assert!(!printed.contains(token), "token printed:\n{printed}");
    assert_eq!(
        setting(&printed, "join-token-file"),
        format!("{token_file:?}")
    );
    assert_eq!(setting(&printed, "max-streams"), "123");

    let printed = assert_round_trip(
        dir.path(),
        "agent",
        &[
            "--label",
            "gpu=a100,zone=lab",
            "--label",
            "rack=r1",
            "--join-token-file",
            token_file,
        ],
        &[("MUSTER_NODE_ID", "gpu-7"), ("MUSTER_MAX_BACKOFF", "45s")],
    );
    assert!(!printed.contains(token), "token printed:\n{printed}");
    assert_eq!(
        setting(&printed, "label"),
        r#"["gpu=a100", "zone=lab", "rack=r1"]"#
    );
    assert_eq!(setting(&printed, "node-id"), "\"gpu-7\"");
}

#[test]
fn the_systemd_units_start_the_daemons_on_the_example_files() {
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    for command in ["coordinator", "agent"] {
        let unit =
            std::fs::read_to_string(contrib.join(format!("muster-{command}.service"))).unwrap();
        let exec_start = format!(
            "ExecStart=/usr/local/bin/muster {command} --config /etc/muster/{command}.toml\n"
        );
        assert!(unit.contains(&exec_start), "muster-{command}.service");
        for setting in [
            "DynamicUser=yes",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
        ] {
            assert!(
                unit.contains(setting),
                "muster-{command}.service lacks {setting}"
            );
        }
        let state = format!("StateDirectory=muster-{command}\n");
        assert!(unit.contains(&state), "muster-{command}.service");

        let example = contrib.join(format!("{command}.toml"));
        let printed = stdout_of(&muster(
            &[
                command,
                "--config",
                example.to_str().unwrap(),
                "--print-config",
            ],
            &[],
        ));
        let kept = if command == "coordinator" {
            "db"
        } else {
            "state-dir"
        };
        assert!(
            setting(&printed, kept).starts_with(&format!("\"/var/lib/muster-{command}")),
            "{command}.toml keeps its {kept} outside the state directory:\n{printed}"
        );
    }
}

#[test]
fn a_tls_key_from_the_file_pairs_with_a_tls_cert_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path(), "coordinator.toml", "tls-key = \"k.pem\"\n");
    let output = muster(
        &[
            "coordinator",
            "--config",
            file.to_str().unwrap(),
            "--tls-cert",
            "c.pem",
            "--print-config",
        ],
        &[],
    );
    let printed = stdout_of(&output);
    assert_eq!(setting(&printed, "tls-cert"), "\"c.pem\"");
    assert_eq!(setting(&printed, "tls-key"), "\"k.pem\"");

    let unpaired = muster(
        &[
            "nodes",
            "list",
            "--coordinator",
            "https://127.0.0.1:9",
            "--tls-cert",
            "c.pem",
        ],
        &[],
    );
    assert_one_line_error(
        &unpaired,
        &["--tls-cert and --tls-key must be given together"],
    );
}
