//! The documentation cannot drift from the command line: the flag tables of
//! CONFIGURATION.md are generated from clap's definition of every command,
//! and every `--flag` the documents mention alone must exist.
//!
//! `MUSTER_UPDATE_DOCS=1 cargo test --test docs` rewrites the tables: a table
//! follows each `<!-- flags: muster COMMAND -->` line, a command without one
//! gets a new section at the end of the file, and a section of a command
//! that is gone is removed. Everything else in the file is left as written.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use clap::{Arg, ArgAction, CommandFactory};
use muster::config::Cli;

const FLAG_TABLES: &str = "CONFIGURATION.md";
const MARKER_START: &str = "<!-- flags: ";
const MARKER_END: &str = " -->";
const REGENERATE: &str = "MUSTER_UPDATE_DOCS=1 cargo test --test docs";
/// Documents whose prose may name flags.
const DOCUMENTS: &[&str] = &[
    "README.md",
    "CONFIGURATION.md",
    "ARCHITECTURE.md",
    "SECURITY.md",
    "RELIABILITY.md",
    "BENCHMARKS.md",
];
/// Flags of other tools that the documents may name alone.
const OTHER_TOOLS_FLAGS: &[&str] = &["--release", "--locked", "--include-ignored"];

fn repository_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// Every command that can be run, by its full name (`muster nodes list`),
/// with its flag table.
fn generated_tables() -> BTreeMap<String, String> {
    let mut cli = Cli::command();
    cli.build();
    let mut tables = BTreeMap::new();
    collect_tables(&cli, "muster", true, &mut tables);
    tables
}

fn collect_tables(
    command: &clap::Command,
    name: &str,
    top: bool,
    tables: &mut BTreeMap<String, String>,
) {
    let rows: Vec<String> = command
        .get_arguments()
        .filter(|arg| !arg.is_hide_set() && !["help", "version"].contains(&arg.get_id().as_str()))
        .filter(|arg| top || !arg.is_global_set())
        .map(row)
        .collect();
    if !rows.is_empty() || !command.has_subcommands() {
        let mut table =
            String::from("| flag | env | default | meaning |\n| --- | --- | --- | --- |\n");
        for row in rows {
            table.push_str(&row);
        }
        tables.insert(name.to_owned(), table);
    }
    for sub in command.get_subcommands() {
        if sub.get_name() != "help" && !sub.is_hide_set() {
            collect_tables(sub, &format!("{name} {}", sub.get_name()), false, tables);
        }
    }
}

fn row(arg: &Arg) -> String {
    let flag = match arg.get_long() {
        Some(long) => format!("`--{long}`"),
        None => format!(
            "`{}` (argument)",
            arg.get_value_names()
                .and_then(|names| names.first())
                .map_or_else(|| arg.get_id().to_string(), ToString::to_string)
        ),
    };
    let env = arg
        .get_env()
        .map(|env| format!("`{}`", env.to_string_lossy()))
        .unwrap_or_default();
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|value| value.to_string_lossy().into_owned())
        .collect();
    let default = match defaults.as_slice() {
        _ if matches!(arg.get_action(), ArgAction::SetTrue) => "off".to_owned(),
        [] if arg.is_required_set() => "required".to_owned(),
        [] => "none".to_owned(),
        [single] if single.is_empty() => "empty".to_owned(),
        values => format!("`{}`", values.join(",")),
    };
    let help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(ToString::to_string)
        .unwrap_or_default();
    let meaning = help
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|");
    format!("| {flag} | {env} | {default} | {meaning} |\n")
}

/// The commands whose tables `text` holds, with the line range of each
/// table (the marker excluded).
fn marked_tables(text: &[&str]) -> Vec<(String, usize, usize)> {
    let mut found = Vec::new();
    for (index, line) in text.iter().enumerate() {
        if let Some(command) = line
            .strip_prefix(MARKER_START)
            .and_then(|rest| rest.strip_suffix(MARKER_END))
        {
            let start = index + 1;
            let end = start
                + text[start..]
                    .iter()
                    .take_while(|line| line.starts_with('|'))
                    .count();
            found.push((command.to_owned(), start, end));
        }
    }
    found
}

/// `text` with every table regenerated, tables of new commands appended and
/// sections of commands that are gone removed.
fn regenerate(text: &str, tables: &BTreeMap<String, String>) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let marked = marked_tables(&lines);
    let mut out: Vec<String> = Vec::new();
    let mut next = 0;
    for (command, start, end) in &marked {
        match tables.get(command) {
            Some(table) => {
                out.extend(lines[next..start - 1].iter().map(|l| l.to_string()));
                out.push(lines[start - 1].to_owned());
                out.extend(table.lines().map(str::to_owned));
            }
            None => {
                // Drop the section: its heading (if it is the line two above
                // the marker), the marker and the table.
                let mut kept: Vec<String> = lines[next..start - 1]
                    .iter()
                    .map(|l| l.to_string())
                    .collect();
                if kept.len() >= 2
                    && kept[kept.len() - 1].is_empty()
                    && kept[kept.len() - 2] == format!("### `{command}`")
                {
                    kept.truncate(kept.len() - 2);
                }
                out.extend(kept);
            }
        }
        next = *end;
    }
    out.extend(lines[next..].iter().map(|l| l.to_string()));
    let documented: BTreeSet<&String> = marked.iter().map(|(command, ..)| command).collect();
    for (command, table) in tables {
        if !documented.contains(command) {
            if out.last().is_some_and(|line| !line.is_empty()) {
                out.push(String::new());
            }
            out.push(format!("### `{command}`"));
            out.push(String::new());
            out.push(format!("{MARKER_START}{command}{MARKER_END}"));
            out.extend(table.lines().map(str::to_owned));
        }
    }
    let mut result = out.join("\n");
    result.push('\n');
    result
}

/// What differs between the documented and the generated tables, one line
/// each, for a failure message.
fn differences(text: &str, tables: &BTreeMap<String, String>) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut documented = BTreeMap::new();
    for (command, start, end) in marked_tables(&lines) {
        documented.insert(command, lines[start..end].join("\n"));
    }
    let mut found = Vec::new();
    for (command, table) in tables {
        let Some(written) = documented.get(command) else {
            found.push(format!("`{command}` has no flag table"));
            continue;
        };
        let flag_of = |row: &str| row.split(" | ").next().unwrap_or_default().to_owned();
        let written_rows: BTreeMap<String, &str> = written
            .lines()
            .skip(2)
            .map(|row| (flag_of(row), row))
            .collect();
        let generated_rows: BTreeMap<String, &str> = table
            .lines()
            .skip(2)
            .map(|row| (flag_of(row), row))
            .collect();
        for (flag, row) in &generated_rows {
            match written_rows.get(flag) {
                None => found.push(format!("`{command}`: flag missing from the table: {row}")),
                Some(written) if written != row => found.push(format!(
                    "`{command}`: row out of date:\n    written:   {written}\n    generated: {row}"
                )),
                Some(_) => {}
            }
        }
        for flag in written_rows.keys() {
            if !generated_rows.contains_key(flag) {
                found.push(format!(
                    "`{command}`: documented flag {flag} no longer exists"
                ));
            }
        }
        if found.is_empty() && written.trim_end() != table.trim_end() {
            found.push(format!("`{command}`: table differs (order or header)"));
        }
    }
    for command in documented.keys() {
        if !tables.contains_key(command) {
            found.push(format!("`{command}` has a flag table but no longer exists"));
        }
    }
    found
}

#[test]
fn the_flag_tables_match_the_command_line() {
    let path = repository_file(FLAG_TABLES);
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let tables = generated_tables();
    let regenerated = regenerate(&text, &tables);
    if regenerated == text {
        return;
    }
    if std::env::var_os("MUSTER_UPDATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &regenerated).expect("write the flag tables");
        eprintln!("rewrote the flag tables of {FLAG_TABLES}");
        return;
    }
    let mut report = differences(&text, &tables);
    if report.is_empty() {
        report.push("the tables differ from the generated ones".to_owned());
    }
    panic!(
        "{FLAG_TABLES} does not match the command line:\n  {}\n\
         Run `{REGENERATE}` to rewrite its tables, then review and commit {FLAG_TABLES}.",
        report.join("\n  ")
    );
}

/// Every long flag of every command.
fn all_flags() -> BTreeSet<String> {
    let mut cli = Cli::command();
    cli.build();
    let mut flags = BTreeSet::new();
    let mut pending = vec![cli];
    while let Some(command) = pending.pop() {
        flags.extend(
            command
                .get_arguments()
                .filter_map(|arg| arg.get_long().map(|long| format!("--{long}"))),
        );
        pending.extend(command.get_subcommands().cloned());
    }
    flags
}

/// `--flag` words at the start of inline code spans of `line`.
fn mentioned_flags(line: &str) -> Vec<String> {
    line.split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| span.starts_with("--"))
        .flat_map(|span| {
            span.split_whitespace()
                .filter(|word| word.starts_with("--"))
                .map(|word| {
                    word.split(['=', ',', '<', '['])
                        .next()
                        .unwrap_or(word)
                        .to_owned()
                })
        })
        .collect()
}

#[test]
fn every_flag_the_documents_mention_exists() {
    let flags = all_flags();
    let mut unknown = Vec::new();
    for document in DOCUMENTS {
        let text = std::fs::read_to_string(repository_file(document))
            .unwrap_or_else(|e| panic!("{document}: {e}; drop it from DOCUMENTS if it is gone"));
        let mut in_code_block = false;
        for (number, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                in_code_block = !in_code_block;
                continue;
            }
            if in_code_block {
                continue;
            }
            for flag in mentioned_flags(line) {
                if !flags.contains(&flag) && !OTHER_TOOLS_FLAGS.contains(&flag.as_str()) {
                    unknown.push(format!("{document}:{}: `{flag}`", number + 1));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the documents mention flags that no muster command has (fix the text, or the \
         flag's name):\n  {}",
        unknown.join("\n  ")
    );
}
