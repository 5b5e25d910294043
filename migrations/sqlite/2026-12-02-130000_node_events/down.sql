DROP TABLE event_log;
DROP TABLE node_events;
