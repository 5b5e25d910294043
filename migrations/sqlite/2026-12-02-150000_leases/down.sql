DROP TABLE lease_generations;
DROP TABLE leases;
