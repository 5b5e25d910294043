DROP TABLE session_generations;
DROP TABLE known_nodes;
