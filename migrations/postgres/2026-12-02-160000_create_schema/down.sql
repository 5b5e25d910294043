DROP TABLE lease_generations;
DROP TABLE leases;
DROP TABLE event_log;
DROP TABLE node_events;
DROP TABLE session_generations;
DROP TABLE known_nodes;
