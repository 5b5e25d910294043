//! Renders nodes as an aligned table for people or as JSON for scripts.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    time::{Duration, SystemTime},
};

use crate::{
    config::OutputFormat,
    proto,
    wire::json::{EventJson, NodeJson, event_kind_name, state_name},
};

pub fn write_nodes(
    out: &mut impl Write,
    format: OutputFormat,
    nodes: &[proto::Node],
) -> io::Result<()> {
    match format {
        OutputFormat::Json => {
            let views: Vec<NodeJson<'_>> = nodes.iter().map(NodeJson::from).collect();
            serde_json::to_writer_pretty(&mut *out, &views)?;
            writeln!(out)
        }
        OutputFormat::Table => write_table(out, nodes),
    }
}

pub fn write_node(
    out: &mut impl Write,
    format: OutputFormat,
    node: &proto::Node,
) -> io::Result<()> {
    match format {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &NodeJson::from(node))?;
            writeln!(out)
        }
        OutputFormat::Table => {
            write_table(out, std::slice::from_ref(node))?;
            if !node.last_probe_error.is_empty() {
                writeln!(out, "last probe error: {}", node.last_probe_error)?;
            }
            Ok(())
        }
    }
}

/// One line telling the operator that no OFFLINE node is being removed.
/// The table's header, once before the events; JSON has none.
pub fn write_event_header(out: &mut impl Write, format: OutputFormat) -> io::Result<()> {
    if format == OutputFormat::Table {
        writeln!(
            out,
            "{:>8}  {:<12}  {:<10}  {:<24}  {:<11}  DRAINED",
            "REVISION", "KIND", "REASON", "NODE", "STATE"
        )?;
    }
    out.flush()
}

/// One line for one event of `muster nodes watch`.
pub fn write_event(
    out: &mut impl Write,
    format: OutputFormat,
    event: &proto::NodeEvent,
) -> io::Result<()> {
    match format {
        OutputFormat::Json => {
            serde_json::to_writer(&mut *out, &EventJson::from(event))?;
            writeln!(out)?;
        }
        OutputFormat::Table => {
            let (node_id, state, drain) = event.node.as_ref().map_or_else(
                || ("-".to_owned(), "-", "-".to_owned()),
                |node| {
                    (
                        node.node_id.clone(),
                        state_name(node.state),
                        drain_cell(node),
                    )
                },
            );
            let reason = if event.reason.is_empty() {
                "-"
            } else {
                &event.reason
            };
            writeln!(
                out,
                "{:>8}  {:<12}  {reason:<10}  {node_id:<24}  {state:<11}  {drain}",
                event.revision,
                event_kind_name(event.kind)
            )?;
        }
    }
    out.flush()
}

pub fn write_expiry_note(out: &mut impl Write, paused: &proto::ExpiryPaused) -> io::Result<()> {
    writeln!(
        out,
        "note: expiry is paused: {} of {} nodes are OFFLINE or UNKNOWN, more than \
         --expiry-guard-fraction {} of the fleet; no node is removed until enough are ONLINE again",
        paused.nodes_down, paused.nodes_known, paused.guard_fraction
    )
}

fn write_table(out: &mut impl Write, nodes: &[proto::Node]) -> io::Result<()> {
    let now = SystemTime::now();
    let header = [
        "NODE",
        "STATE",
        "LAST SEEN",
        "AGENT URL",
        "GEN",
        "LABELS",
        "DRAINED",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 7]> = nodes
        .iter()
        .map(|node| {
            let labels: Vec<String> = node
                .labels
                .iter()
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            [
                node.node_id.clone(),
                state_name(node.state).to_owned(),
                node.last_seen
                    .map_or_else(|| "-".to_owned(), |seen| age(seen, now)),
                node.agent_url.clone(),
                node.session_generation.to_string(),
                labels.join(","),
                drain_cell(node),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

/// `-` for a node in service; the reason, quoted, for a drained one.
fn drain_cell(node: &proto::Node) -> String {
    if node.drained {
        format!("{:?}", node.drain_reason)
    } else {
        "-".to_owned()
    }
}

fn to_system_time(timestamp: prost_types::Timestamp) -> SystemTime {
    SystemTime::try_from(timestamp).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn age(timestamp: prost_types::Timestamp, now: SystemTime) -> String {
    let elapsed = now
        .duration_since(to_system_time(timestamp))
        .unwrap_or_default();
    let whole_seconds = Duration::from_secs(elapsed.as_secs());
    format!("{} ago", humantime::format_duration(whole_seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, state: proto::NodeState) -> proto::Node {
        proto::Node {
            node_id: id.to_owned(),
            agent_url: format!("http://{id}:7701"),
            state: state.into(),
            last_seen: Some(SystemTime::now().into()),
            labels: [("gpu".to_owned(), "a100".to_owned())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn table_has_a_header_and_aligned_rows() {
        let mut out = Vec::new();
        let nodes = [
            node("gpu-1", proto::NodeState::Online),
            node("a", proto::NodeState::Unknown),
        ];
        write_nodes(&mut out, OutputFormat::Table, &nodes).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NODE   STATE"), "{text}");
        assert!(lines[1].starts_with("gpu-1  ONLINE"), "{text}");
        assert!(
            lines[2].contains("UNKNOWN") && lines[2].contains("gpu=a100"),
            "{text}"
        );
    }

    #[test]
    fn a_drained_node_shows_its_reason_in_the_table_and_in_json() {
        let mut drained = node("gpu-1", proto::NodeState::Online);
        drained.drained = true;
        drained.drain_reason = "fan replacement".to_owned();
        drained.drained_at = Some(SystemTime::now().into());
        let nodes = [drained, node("gpu-2", proto::NodeState::Left)];
        let mut out = Vec::new();
        write_nodes(&mut out, OutputFormat::Table, &nodes).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert!(lines[0].ends_with("DRAINED"), "{text}");
        assert!(lines[1].ends_with("\"fan replacement\""), "{text}");
        assert!(
            lines[2].contains("LEFT") && lines[2].ends_with('-'),
            "{text}"
        );

        let mut out = Vec::new();
        write_nodes(&mut out, OutputFormat::Json, &nodes).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed[0]["drained"], true);
        assert_eq!(parsed[0]["drain_reason"], "fan replacement");
        assert!(parsed[0]["drained_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(parsed[1]["drained"], false);
        assert!(parsed[1]["drain_reason"].is_null());
        assert_eq!(parsed[1]["state"], "LEFT");
    }

    #[test]
    fn the_expiry_note_names_the_counts_and_the_flag() {
        let mut out = Vec::new();
        let paused = proto::ExpiryPaused {
            nodes_down: 7,
            nodes_known: 10,
            guard_fraction: 0.5,
        };
        write_expiry_note(&mut out, &paused).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("7 of 10 nodes"), "{text}");
        assert!(text.contains("--expiry-guard-fraction 0.5"), "{text}");
    }

    #[test]
    fn a_watch_event_is_one_line_in_either_format() {
        let event = proto::NodeEvent {
            revision: 42,
            kind: proto::NodeEventKind::Changed.into(),
            node: Some(node("a", proto::NodeState::Offline)),
            reason: "offline".to_owned(),
            database_id: "d1".to_owned(),
        };
        let mut json = Vec::new();
        write_event(&mut json, OutputFormat::Json, &event).unwrap();
        let text = String::from_utf8(json).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["revision"], 42);
        assert_eq!(parsed["kind"], "changed");
        assert_eq!(parsed["reason"], "offline");
        assert_eq!(parsed["database_id"], "d1");
        assert_eq!(parsed["node"]["state"], "OFFLINE");

        let mut header = Vec::new();
        write_event_header(&mut header, OutputFormat::Json).unwrap();
        assert!(header.is_empty(), "JSON lines only");
        write_event_header(&mut header, OutputFormat::Table).unwrap();
        let header = String::from_utf8(header).unwrap();
        let mut table = Vec::new();
        write_event(&mut table, OutputFormat::Table, &event).unwrap();
        let line = String::from_utf8(table).unwrap();
        assert_eq!(line.lines().count(), 1);
        assert_eq!(
            header.find("NODE"),
            line.find(" a ").map(|at| at + 1),
            "columns line up:\n{header}{line}"
        );
        for word in ["42", "changed", "offline", "a", "OFFLINE"] {
            assert!(line.split_whitespace().any(|w| w == word), "{word}: {line}");
        }
    }

    #[test]
    fn json_is_machine_readable() {
        let mut out = Vec::new();
        write_nodes(
            &mut out,
            OutputFormat::Json,
            &[node("gpu-1", proto::NodeState::Offline)],
        )
        .unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed[0]["node_id"], "gpu-1");
        assert_eq!(parsed[0]["state"], "OFFLINE");
        assert_eq!(parsed[0]["labels"]["gpu"], "a100");
        assert!(parsed[0]["last_seen"].as_str().unwrap().ends_with('Z'));
    }
}
