//! Settings for the daemons from a TOML file: `--config FILE` or
//! `MUSTER_CONFIG`, keyed by long flag name (`heartbeat-interval = "5s"`,
//! `label = ["gpu=a100"]`).
//!
//! Invariants:
//! - A value is taken from the command line, else from the environment, else
//!   from the file, else the built-in default. The file's values become the
//!   defaults of their flags before clap parses, so clap alone applies that
//!   order, and a value from the file goes through the same parser as the flag.
//! - Every key must be a long flag of the command: any other key, and any
//!   value the flag's parser refuses, is a one-line error naming the key and
//!   the file, even when a flag overrides that key.
//! - `--print-config` prints every setting in effect as TOML that, given back
//!   through `--config`, prints the same again. Values whose environment
//!   variable is hidden are never printed; a token file's path is printed,
//!   never its contents.

use std::{
    ffi::{OsStr, OsString},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches, error::ErrorKind};

use super::{Cli, Command};

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    Run(Box<Cli>),
    /// The effective configuration, as TOML, to print instead of running.
    PrintConfig(String),
}

/// Arguments of the commands that read a configuration file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigFileArgs {
    /// TOML file of settings, keyed by long flag name (`offline-after =
    /// "15s"`); flags and environment variables override it.
    #[arg(long = "config", env = "MUSTER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the configuration in effect, as a file for --config, and exit.
    #[arg(long = "print-config")]
    pub print_config: bool,
}

/// Ids of the arguments that cannot be set from the file.
const NOT_SETTINGS: &[&str] = &["config", "print_config", "help", "version"];

/// Parses the command line, reading the configuration file it names.
pub fn parse<I, T>(args: I) -> Result<Invocation, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut matches = Cli::command().try_get_matches_from(&args)?;
    let Some((name, sub_matches)) = matches.subcommand() else {
        return Ok(Invocation::Run(Box::new(Cli::from_arg_matches(&matches)?)));
    };
    let name = name.to_owned();
    let file = sub_matches
        .try_get_one::<PathBuf>("config")
        .ok()
        .flatten()
        .cloned();
    let print_config = sub_matches
        .try_get_one::<bool>("print_config")
        .ok()
        .flatten()
        .copied()
        .unwrap_or(false);

    if let Some(file) = &file {
        let command = with_file_defaults(Cli::command(), &name, file)?;
        matches = command.try_get_matches_from(&args)?;
    }
    let cli = Cli::from_arg_matches(&matches)?;
    if !print_config {
        return Ok(Invocation::Run(Box::new(cli)));
    }
    let invalid = match &cli.command {
        Command::Coordinator(config) => config.validate().err(),
        Command::Agent(config) => config.validate().err(),
        _ => None,
    };
    if let Some(invalid) = invalid {
        return Err(one_line(ErrorKind::ValueValidation, invalid));
    }
    Ok(Invocation::PrintConfig(render(&name, &matches)))
}

/// A clap error printed as `error: MESSAGE` on one line.
fn one_line(kind: ErrorKind, message: impl std::fmt::Display) -> clap::Error {
    let message = message.to_string().replace('\n', " ");
    clap::Error::raw(kind, format!("{message}\n"))
}

/// The arguments of subcommand `name` that the file may set, in `--help`
/// order, global ones (such as `--log`) included.
fn settings(command: &mut clap::Command, name: &str) -> Vec<Arg> {
    command.build();
    let subcommand = command
        .find_subcommand(name)
        .expect("parsed subcommand exists");
    subcommand
        .get_arguments()
        .filter(|arg| arg.get_long().is_some() && !NOT_SETTINGS.contains(&arg.get_id().as_str()))
        .cloned()
        .collect()
}

fn read_table(file: &Path) -> Result<toml::Table, clap::Error> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        one_line(
            ErrorKind::Io,
            format!("cannot read config file {}: {e}", file.display()),
        )
    })?;
    text.parse::<toml::Table>().map_err(|e| {
        let place = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{column}")
            })
            .unwrap_or_default();
        one_line(
            ErrorKind::InvalidValue,
            format!(
                "config file {}{place} is not valid TOML: {}",
                file.display(),
                e.message()
            ),
        )
    })
}

/// `command` with the values of `file` as the defaults of the flags of
/// subcommand `name` they are keyed by.
fn with_file_defaults(
    mut command: clap::Command,
    name: &str,
    file: &Path,
) -> Result<clap::Command, clap::Error> {
    let table = read_table(file)?;
    let settings = settings(&mut command.clone(), name);
    for (key, value) in table {
        let Some(arg) = settings.iter().find(|arg| arg.get_long() == Some(&key)) else {
            return Err(one_line(
                ErrorKind::UnknownArgument,
                format!(
                    "unknown key `{key}` in config file {}: keys are the long flags of `muster {name} --help`",
                    file.display()
                ),
            ));
        };
        let values = values_of(arg, &value).map_err(|reason| {
            one_line(
                ErrorKind::InvalidValue,
                format!("key `{key}` in config file {}: {reason}", file.display()),
            )
        })?;
        let id = arg.get_id().clone();
        let set_default = move |arg: Arg| arg.default_values(values);
        command = if arg.is_global_set() {
            command.mut_arg(id, set_default)
        } else {
            command.mut_subcommand(name, |sub| sub.mut_arg(id, set_default))
        };
    }
    Ok(command)
}

/// The raw values a TOML value stands for, checked by the flag's own parser.
fn values_of(arg: &Arg, value: &toml::Value) -> Result<Vec<String>, String> {
    let flag = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
    let repeatable = matches!(arg.get_action(), ArgAction::Append);
    let values = match value {
        toml::Value::Boolean(b) if flag => return Ok(vec![b.to_string()]),
        _ if flag => return Err(format!("expected true or false, got {value}")),
        toml::Value::Array(items) if repeatable => {
            items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?
        }
        toml::Value::Array(_) => return Err("takes one value, not a list".to_owned()),
        other => vec![scalar(other)?],
    };
    let values: Vec<String> = match arg.get_value_delimiter() {
        Some(delimiter) => values
            .iter()
            .flat_map(|v| v.split(delimiter).map(str::to_owned))
            .collect(),
        None => values,
    };
    check_with_parser(arg, &values)?;
    Ok(values)
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, a number or a boolean, got a {}",
            other.type_str()
        )),
    }
}

/// Runs `values` through the parser of `arg` alone, so that an invalid
/// value is refused even when a flag overrides it.
fn check_with_parser(arg: &Arg, values: &[String]) -> Result<(), String> {
    let long = arg.get_long().expect("settings have a long flag");
    let probe = Arg::new(arg.get_id().clone())
        .long(long.to_owned())
        .value_names(arg.get_value_names().unwrap_or_default().to_vec())
        .value_parser(arg.get_value_parser().clone())
        .action(ArgAction::Append);
    let args = values.iter().map(|v| format!("--{long}={v}"));
    clap::Command::new("muster")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(probe)
        .try_get_matches_from(args)
        .map(drop)
        .map_err(|e| {
            let rendered = e.render().to_string();
            let first_line = rendered.lines().next().unwrap_or_default();
            first_line
                .strip_prefix("error: ")
                .unwrap_or(first_line)
                .to_owned()
        })
}

/// The settings in effect for subcommand `name`, as a TOML file.
fn render(name: &str, matches: &ArgMatches) -> String {
    let (_, sub_matches) = matches.subcommand().expect("parsed subcommand");
    let mut out = format!("# Configuration of `muster {name}`, for --config.\n");
    for arg in settings(&mut Cli::command(), name) {
        let id = arg.get_id().as_str();
        let key = arg.get_long().expect("settings have a long flag");
        let raw: Option<Vec<&OsStr>> = sub_matches.get_raw(id).map(Iterator::collect);
        let _ = match raw {
            None => writeln!(out, "# {key} is not set"),
            Some(_) if arg.is_hide_env_values_set() => {
                writeln!(out, "# {key} is set, and not printed")
            }
            Some(raw) => writeln!(out, "{key} = {}", toml_value(&arg, &raw)),
        };
    }
    out
}

fn toml_value(arg: &Arg, raw: &[&OsStr]) -> toml::Value {
    let typed = |raw: &OsStr| {
        let text = raw.to_string_lossy().into_owned();
        let parser = arg.get_value_parser().type_id();
        let integer = [
            std::any::TypeId::of::<u8>(),
            std::any::TypeId::of::<u16>(),
            std::any::TypeId::of::<u32>(),
            std::any::TypeId::of::<u64>(),
            std::any::TypeId::of::<i64>(),
            std::any::TypeId::of::<usize>(),
        ]
        .iter()
        .any(|t| parser == *t);
        let typed = if integer {
            text.parse().ok().map(toml::Value::Integer)
        } else if parser == std::any::TypeId::of::<bool>() {
            text.parse().ok().map(toml::Value::Boolean)
        } else if parser == std::any::TypeId::of::<f64>() {
            text.parse().ok().map(toml::Value::Float)
        } else if parser == std::any::TypeId::of::<super::Database>() {
            // A PostgreSQL URL's password is printed as `***`.
            super::Database::parse(&text)
                .ok()
                .map(|db| toml::Value::String(db.to_string()))
        } else {
            None
        };
        typed.unwrap_or(toml::Value::String(text))
    };
    if matches!(arg.get_action(), ArgAction::Append) {
        toml::Value::Array(raw.iter().map(|r| typed(r)).collect())
    } else {
        typed(raw[0])
    }
}
