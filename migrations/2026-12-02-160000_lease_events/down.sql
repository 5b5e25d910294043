DROP TABLE lease_event_log;
DROP TABLE lease_events;
