//! The failures the cluster is built for, each checked on the node list.

use std::time::{Duration, Instant, SystemTime};

use crate::{
    AGENTS, BACK_ONLINE_WITHIN, COMMAND_DEADLINE, EXPIRE_AFTER, LOST_AGENT_OFFLINE_WITHIN,
    PARTITION_OFFLINE_WITHIN,
    cluster::{AgentContainer, Cluster},
    commands::{checked, run},
    nodes::{Node, all_online, find, is_in},
};

impl Cluster {
    /// The static binary resolves compose service names in a scratch image:
    /// agents reached `coordinator` to register, and the coordinator reaches
    /// each agent by its service name, as its probes do.
    pub fn check_name_resolution(&self) {
        for agent in AGENTS {
            let url = format!("http://{agent}:7701");
            let health = self.exec(&["health", "--addr", &url]);
            checked(
                health,
                &format!("resolving and reaching {url} from the coordinator's container"),
            );
        }
    }

    /// Runs `restart` on the coordinator and checks that every agent is
    /// ONLINE again within 10 s of the coordinator being back, from rows kept
    /// in the volume, with no agent container touched. Returns the time it
    /// took.
    pub fn coordinator_comes_back(
        &self,
        agents: &[AgentContainer],
        before: &[Node],
        restart: impl FnOnce(&Self),
    ) -> Duration {
        let started_at = "{{.State.StartedAt}}";
        let coordinator_started = self.inspect(&self.coordinator, started_at);
        restart(self);
        assert_ne!(
            self.inspect(&self.coordinator, started_at),
            coordinator_started,
            "the coordinator's container did not restart"
        );
        let (after, took) = self.wait_timed(
            "all agents ONLINE after the coordinator restarted",
            Instant::now(),
            BACK_ONLINE_WITHIN,
            &mut |nodes| all_online(nodes, &AGENTS),
        );
        for agent in AGENTS {
            let (old, new) = (find(before, agent).unwrap(), find(&after, agent).unwrap());
            assert_eq!(
                old.registered_at, new.registered_at,
                "{agent}'s row was not kept in the volume"
            );
            assert!(
                new.session_generation >= old.session_generation,
                "{agent}'s session generation went back: {old:?} then {new:?}"
            );
            assert_eq!(old.boot_id, new.boot_id, "{agent} was restarted");
        }
        assert_eq!(
            self.agent_containers(),
            agents,
            "an agent container was touched"
        );
        took
    }

    /// `compose kill agent-3`: it is OFFLINE within 2 s of its container
    /// dying, and the others stay ONLINE throughout. The list is polled while
    /// compose is still at work, and the time is counted from the moment
    /// the engine recorded the container's end, so compose's own start-up
    /// and exit are not charged to the coordinator. Returns that time, and
    /// when the OFFLINE state was seen.
    pub fn agent_lost(&self) -> (Duration, Instant) {
        let container = self.container("agent-3");
        let mut kill = self.command(&["kill", "agent-3"]);
        let killing = std::thread::spawn(move || run(&mut kill));
        let offline_seen = self.wait_for(
            "agent-3 OFFLINE after its container was killed",
            COMMAND_DEADLINE,
            |nodes| {
                assert!(
                    all_online(nodes, &["agent-1", "agent-2"]).is_some(),
                    "an agent that was not killed left ONLINE: {nodes:#?}"
                );
                is_in(nodes, "agent-3", "OFFLINE").then(|| (SystemTime::now(), Instant::now()))
            },
        );
        checked(
            killing.join().expect("compose kill thread"),
            "compose kill agent-3",
        );
        let died = self.inspect(&container, "{{.State.FinishedAt}}");
        let died = humantime::parse_rfc3339(&died).expect("FinishedAt is RFC 3339");
        if let Ok(early) = died.duration_since(offline_seen.0) {
            assert!(
                early < Duration::from_secs(1),
                "agent-3 was OFFLINE {early:?} before its container died"
            );
        }
        let took = offline_seen.0.duration_since(died).unwrap_or_default();
        assert!(
            took <= LOST_AGENT_OFFLINE_WITHIN,
            "agent-3 was shown OFFLINE {took:?} after its container died, more than {LOST_AGENT_OFFLINE_WITHIN:?}"
        );
        (took, offline_seen.1)
    }

    /// Disconnects agent-2 from the network: OFFLINE within offline-after
    /// plus 2 s, then ONLINE within 10 s of reconnecting, the same agent
    /// process throughout. Returns both times.
    pub fn agent_partitioned(&self, agents: &[AgentContainer]) -> (Duration, Duration) {
        let agent = agents.iter().find(|a| a.name == "agent-2").unwrap();
        let network = format!("{}_muster", self.project);
        let boot_id = find(&self.nodes().expect("node list"), "agent-2")
            .expect("agent-2 listed")
            .boot_id
            .clone();

        self.docker(&["network", "disconnect", &network, &agent.id]);
        let (_, offline) = self.wait_timed(
            "partitioned agent-2 OFFLINE",
            Instant::now(),
            PARTITION_OFFLINE_WITHIN,
            &mut |nodes| {
                assert!(
                    is_in(nodes, "agent-1", "ONLINE"),
                    "agent-1 left ONLINE: {nodes:#?}"
                );
                is_in(nodes, "agent-2", "OFFLINE").then_some(())
            },
        );

        self.docker(&[
            "network", "connect", "--alias", "agent-2", &network, &agent.id,
        ]);
        let (node, online) = self.wait_timed(
            "agent-2 ONLINE after the partition healed",
            Instant::now(),
            BACK_ONLINE_WITHIN,
            &mut |nodes| {
                find(nodes, "agent-2")
                    .filter(|n| n.state == "ONLINE")
                    .cloned()
            },
        );
        assert_eq!(node.boot_id, boot_id, "agent-2 was restarted");
        assert_eq!(
            self.inspect(&agent.id, "{{.State.StartedAt}}"),
            agent.started_at,
            "agent-2's container was restarted"
        );
        (offline, online)
    }

    /// The killed agent-3, OFFLINE since `offline`, is removed once that has
    /// lasted expire-after; the others are untouched.
    pub fn lost_agent_expires(&self, offline: Instant) -> Duration {
        let nodes = self.nodes().expect("node list");
        assert!(
            find(&nodes, "agent-3").is_some() || offline.elapsed() >= EXPIRE_AFTER,
            "agent-3 expired after {:?}, sooner than {EXPIRE_AFTER:?}",
            offline.elapsed()
        );
        let (_, took) = self.wait_timed(
            "agent-3 to expire",
            offline,
            EXPIRE_AFTER + Duration::from_secs(5),
            &mut |nodes| {
                let gone = find(nodes, "agent-3").is_none();
                (gone && all_online(nodes, &["agent-1", "agent-2"]).is_some()).then_some(())
            },
        );
        took
    }
}
