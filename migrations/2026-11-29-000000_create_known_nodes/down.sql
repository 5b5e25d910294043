DROP TABLE known_nodes;
