"""A DPS (Azure IoT Hub Device Provisioning Service) protocol test server for the enrollment API."""
